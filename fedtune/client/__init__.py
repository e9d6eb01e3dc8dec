"""The data-site side: Flower ClientApp, the site's data, and local training."""

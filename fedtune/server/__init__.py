"""The aggregation-server side: Flower ServerApp, the round loop, evaluation, checkpoints, reports."""

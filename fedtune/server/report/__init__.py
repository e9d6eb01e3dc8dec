"""What a run shows and leaves behind: the console table (``table``), the files in OUT (``files``) and the
privacy and secure-aggregation statements of ``summary.json`` (``trust``)."""

from fedtune.server.report.files import METRICS_FILE, SUMMARY_FILE, TABLE_FILE, Reporter, plot_losses, summary
from fedtune.server.report.table import COLUMNS, Column, columns, config_tree, human_bytes, table_header, table_row
from fedtune.server.report.trust import covers, privacy_line, privacy_summary, secagg_summary, trust

__all__ = [
    "COLUMNS",
    "METRICS_FILE",
    "SUMMARY_FILE",
    "TABLE_FILE",
    "Column",
    "Reporter",
    "columns",
    "config_tree",
    "covers",
    "human_bytes",
    "plot_losses",
    "privacy_line",
    "privacy_summary",
    "secagg_summary",
    "summary",
    "table_header",
    "table_row",
    "trust",
]

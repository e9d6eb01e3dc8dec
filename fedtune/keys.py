"""Record and config keys shared by server and client; use these constants, never literals."""

# RecordDict entries
ADAPTER = "adapter"  # ArrayRecord: the global adapter (server -> client)
DELTA = "delta"  # ArrayRecord: local minus global, PEFT state-dict keys (client -> server)
SPEC = "spec"  # ConfigRecord: the round's flat config (server -> client)
METRICS = "metrics"  # MetricRecord: client metrics (client -> server)

# MetricRecord entries
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
EVAL_LOSS = "eval-loss"
STEPS = "steps"
LORA_RANK = "lora-rank"  # the rank a site trained at (heterogeneous ranks)

# ConfigRecord entries beside the flat config
ROUND = "round"

# Node config (set per SuperNode with --node-config, or by the simulation engine)
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"
WORKER = "worker"  # the site worker's Unix socket; the ClientApp forwards each message to it

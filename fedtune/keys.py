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
EPSILON = "epsilon"  # dp-sgd: the site's sample-level epsilon after this round
NOISE_MULTIPLIER = "noise-multiplier"  # dp-sgd: the noise multiplier the site trained with
BUDGET_EXHAUSTED = "budget-exhausted"  # dp-sgd: 1 when the site declines the round (not an error)
UNDER_CLIP = "under-clip"  # central, client clipping: 1 if the delta fit under C before clipping

# ConfigRecord entries beside the flat config
ROUND = "round"
RUN_ID = "run-id"  # the fedtune run (survives a server resume; keys a site's privacy ledger)
DP_PLANNED_STEPS = "dp-planned-steps"  # local steps over every dp-sgd round of the plan

# Node config (set per SuperNode with --node-config, or by the simulation engine)
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"
STATE_DIR = "state-dir"  # where a site keeps its privacy ledger between restarts
WORKER = "worker"  # the site worker's Unix socket; the ClientApp forwards each message to it

"""Record and config keys shared by server and client; use these constants, never literals."""

# RecordDict entries
ADAPTER = "adapter"  # ArrayRecord: the global adapter, packed (server -> client)
DELTA = "delta"  # ArrayRecord: local minus global over the PEFT state-dict keys, packed (client -> server)
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
NUM_GENERATED = "num-generated"  # eval: held-out examples the task metrics were generated for
# eval replies carry each task metric under its `eval.metrics` name ("rouge-l", "f1", ...)
DATA_CHECK = "data-"  # train, privacy.mechanism = none: "data-malformed", "data-empty", ... (counts)

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
GRID_DELAYS = "grid-delays"  # the in-process grid holds replies for `simulation.site-delays`: the site must not sleep

# The server's last message of a run ("query.<action>"): each connected site logs that the run finished.
RUN_FINISHED = "run_finished"
ROUNDS_DONE = "rounds"  # in its SPEC: the rounds the run completed

# SecAgg+ (``secagg.protocol = secagg``): message actions ("query.<action>", "train.<action>"; Flower
# wants Python identifiers) and the entries of the ``SECAGG`` ConfigRecord each stage carries.
SECAGG_KEYS = "secagg_keys"  # query: advertise two public keys (+ examples and rank in the clear)
SECAGG_SHARE = "secagg_share"  # query: neighbours' public keys in, encrypted shares out
SECAGG_TRAIN = "secagg"  # train: adapter + shares addressed to the client in, masked input out
SECAGG_UNMASK = "secagg_unmask"  # query: survivors and dropped in, seed / key shares out
SECAGG = "secagg"  # ConfigRecord of a stage's protocol data (both ways)
MASKED = "masked"  # ArrayRecord: the masked, quantized update (uint, one flat vector)
SA_IDS = "ids"  # node ids that the parallel lists below belong to
SA_ENC_KEY = "encryption-key"
SA_MASK_KEY = "mask-key"
SA_CIPHERTEXTS = "ciphertexts"
SA_THRESHOLD = "threshold"
SA_CLIENTS = "clients"  # |U1|, the clients that advertised keys: each one recomputes its degree and threshold
SA_ALPHA = "alpha"  # w_i / max_j w_j: the client scales its delta by it (FedAvg weighting)
SA_QUANT_BITS = "quant-bits"
SA_CLIP = "clip"
SA_MODULUS_BITS = "modulus-bits"
SA_LENGTH = "length"  # entries of the flat vector (sorted PEFT keys at the global rank)
SA_SURVIVORS = "survivors"
SA_DROPPED = "dropped"
SA_SEED_OWNERS = "seed-owners"
SA_SEED_SHARES = "seed-shares"
SA_KEY_OWNERS = "key-owners"
SA_KEY_SHARES = "key-shares"

# Every message with arrays (``compression.*``; ``none`` is float32): the ArrayRecord holds one uint8
# array, this ConfigRecord its index (scheme, names, shapes); see fedtune/wire/codec.py.
WIRE = "wire"
# LoRA-SB's downlink: the adapter's index also names the SHA-256 fingerprint of the fixed A and B (the
# frame, fedtune/model/sb.py) that complete it. The frame itself travels only to a site not known to hold it.
FRAME = "frame"
# Seconds a site spent on its part of a train round (MetricRecord; the per-round time breakdown)
TIME_LOAD = "time-load"  # open the site, put the global adapter into the model
TIME_TRAIN = "time-train"  # local steps, delta and privacy step
TIME_SERIALIZE = "time-serialize"  # encode the delta and build the reply's records

#: SecAgg+ masked values travel as unsigned integers of at most this many bits.
MAX_MODULUS_BITS = 32

# Personalization (``lora.share = a``, ``personalize.local-steps``): eval replies and node config
PERSONAL_EVAL_LOSS = "personal-eval-loss"  # eval: the site's personal adapter's loss on its held-out split
SITE_OUT = "out-dir"  # node config: where a deployed site writes its personal adapter (`fedtune client --out`)

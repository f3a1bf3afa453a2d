"""The defaults the Trainer and the command line share (the CLI's --help shows them).

lr 3e-3 and clipping at norm 1.0 suit the LSTM models here: Adam at 3e-3 trains a small LSTM
language model quickly, and clipping is the standard guard against exploding LSTM gradients.
"""

LR = 3e-3
WEIGHT_DECAY = 0.0
GRAD_CLIP = 1.0
L1 = 0.0
EPOCHS = 1
MAX_STEPS = None
EVAL_EVERY = None
SCHEDULER = None
WARMUP_STEPS = 0
ACCUMULATION_STEPS = 1
CHECKPOINT_EVERY = None
LOG_EVERY = 10
SEED = 0
DEVICE = "auto"
PRECISION = "fp32"
BATCH_SIZE = 16
SEQ_LEN = 64
VAL_FRACTION = 0.1

# knowledge distillation (`pyengine distill`, pyengine.models.Distillation): placeholders, set
# from the demo's measurements below
DISTILL_KIND = "jsd"
DISTILL_TEMPERATURE = 1.0
DISTILL_ALPHA = 0.5
DISTILL_BETA = 0.5

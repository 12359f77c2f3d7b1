from modules.rlhf.rlhf import *  # noqa: F401,F403

from modules.bcq.bcq import *  # noqa: F401,F403

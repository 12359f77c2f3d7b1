from modules.sft.sft import *  # noqa: F401,F403

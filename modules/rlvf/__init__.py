from modules.rlvf.rlvf import *  # noqa: F401,F403

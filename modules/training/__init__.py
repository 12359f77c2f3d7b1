from modules.training.training import *  # noqa: F401,F403

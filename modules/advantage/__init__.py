from modules.advantage.advantage import *  # noqa: F401,F403

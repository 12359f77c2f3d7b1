from modules.attention.attention import *  # noqa: F401,F403

from modules.gae.gae import *  # noqa: F401,F403

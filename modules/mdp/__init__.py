from modules.mdp.mdp import *  # noqa: F401,F403

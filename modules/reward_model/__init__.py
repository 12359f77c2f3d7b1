from modules.reward_model.reward_model import *  # noqa: F401,F403

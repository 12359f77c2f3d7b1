from modules.policy_gradient.policy_gradient import *  # noqa: F401,F403

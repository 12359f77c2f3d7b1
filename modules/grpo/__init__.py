from modules.grpo.grpo import *  # noqa: F401,F403

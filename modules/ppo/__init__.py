from modules.ppo.core import *  # noqa: F401,F403
from modules.ppo.rollout import *  # noqa: F401,F403
from modules.ppo.ppo import *  # noqa: F401,F403

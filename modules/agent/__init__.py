from modules.agent.loop import *  # noqa: F401,F403
from modules.agent.task import *  # noqa: F401,F403

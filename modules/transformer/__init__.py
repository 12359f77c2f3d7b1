from modules.transformer.transformer import *  # noqa: F401,F403
from modules.transformer.sampling import *  # noqa: F401,F403
from modules.transformer.task import *  # noqa: F401,F403

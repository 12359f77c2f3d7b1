from modules.vlm.task import *  # noqa: F401,F403
from modules.vlm.projection import *  # noqa: F401,F403
from modules.vlm.qformer import *  # noqa: F401,F403
from modules.vlm.flamingo import *  # noqa: F401,F403

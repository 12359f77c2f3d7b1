from modules.actor_critic.actor_critic import *  # noqa: F401,F403

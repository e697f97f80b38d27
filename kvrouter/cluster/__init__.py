"""Several routers sharing model state through Redis (``cluster.redis_url``)."""
from kvrouter.cluster.member import Cluster

__all__ = ["Cluster"]

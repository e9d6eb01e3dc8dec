"""Privacy mechanisms, registered by the name ``privacy.mechanism`` selects.

Each is one object that owns its site step, its server aggregator, its accounting events and its
composition rules (:class:`Mechanism`). Adding one means adding a module and registering it here
(or, in a test, with ``MECHANISMS.register(name)(obj)``).
"""

from fedtune.core.registry import Registry
from fedtune.privacy.mechanisms.base import Mechanism
from fedtune.privacy.mechanisms.central import CentralDP
from fedtune.privacy.mechanisms.distributed import DistributedDP
from fedtune.privacy.mechanisms.dp_sgd import DPSGD
from fedtune.privacy.mechanisms.local import LocalDP
from fedtune.privacy.mechanisms.none import NoDP

MECHANISMS: Registry[Mechanism] = Registry("privacy.mechanism")
for _mechanism in (NoDP(), DPSGD(), CentralDP(), LocalDP(), DistributedDP()):
    MECHANISMS.register(_mechanism.name)(_mechanism)


def mechanism_of(name: str) -> Mechanism:
    """The registered mechanism ``name``; ConfigError listing the known names otherwise."""
    return MECHANISMS.get(name)


__all__ = ["MECHANISMS", "Mechanism", "mechanism_of"]

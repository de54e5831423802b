"""Extra networks: LoRA / LyCORIS, hypernetworks, and the manager the engine calls.

Entry point for the engine: :class:`NetworkManager` (``manager.py``).
"""

from voidprompt.models.networks.hypernetworks import Hypernetwork, load_hypernetwork
from voidprompt.models.networks.lora import LoraNetwork, build_layer_map, load_lora
from voidprompt.models.networks.manager import AppliedNetworks, NetworkManager

__all__ = [
    "AppliedNetworks",
    "Hypernetwork",
    "LoraNetwork",
    "NetworkManager",
    "build_layer_map",
    "load_hypernetwork",
    "load_lora",
]

"""Run a peer script (``_l2l_step.py``) with this interpreter's torch and the peer venv's
learn2learn: ``python _peer_on_project_torch.py PEER_SITE_PACKAGES SCRIPT [ARGS...]``.

``maml_step.py --peer-on-project-torch PEER_SITE_PACKAGES`` uses it so that learn2learn and
metalearn are timed on the same torch build (the peer venv has its own, newer torch). The peer's
site-packages go at the end of ``sys.path``, so this interpreter's torch wins; its torchvision,
built for the other torch, cannot load here, and learn2learn imports it (and gym) only for its
datasets and environments, so those packages are replaced by empty stand-ins: the MAML wrapper
needs torch alone.

PEER_SITE_PACKAGES may also be a folder holding learn2learn's bare source (the ``learn2learn``
folder of its sdist, ``pip download --no-deps learn2learn==0.2.0``), so that it runs where it
cannot be installed or built (a GPU machine without internet, another Python): its
``data``, ``vision``, ``text``, ``gym`` and ``algorithms.lightning`` subpackages (Cython
extensions, dataset and Lightning code the MAML wrapper does not use) are stand-ins too.
``scripts/gpu-vs-learn2learn.sh`` does this.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import runpy
import sys
from unittest import mock

STUBBED = ("torchvision", "torchaudio", "torchtext", "gym",
           "learn2learn.data", "learn2learn.vision", "learn2learn.text", "learn2learn.gym",
           "learn2learn.algorithms.lightning")  # its PyTorch Lightning modules: unused, and 0.2.0's
                                                # import of a newer pytorch_lightning is untried


class StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of the STUBBED packages (and their submodules) give empty mock modules."""

    def find_spec(self, name, path=None, target=None):
        if any(name == stub or name.startswith(stub + ".") for stub in STUBBED):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = mock.MagicMock(name=spec.name)
        module.__path__, module.__spec__ = [], spec
        return module

    def exec_module(self, module):
        pass


if __name__ == "__main__":
    site_packages, script = sys.argv[1], sys.argv[2]
    sys.meta_path.insert(0, StandIns())
    sys.path.append(site_packages)
    sys.argv = sys.argv[2:]
    runpy.run_path(script, run_name="__main__")

"""opcheck for every registered op on every available device, driven by the op manifest."""

import pytest
import torch

from gradience_kernels.op_manifest import MANIFEST, registered_ops
from conftest import devices


def test_manifest_covers_every_registered_op():
    names = [entry.qualified for entry in MANIFEST]
    assert len(names) == len(set(names))
    assert set(names) == registered_ops()


@pytest.mark.parametrize("device_name", devices())
@pytest.mark.parametrize("entry", MANIFEST, ids=lambda e: e.qualified)
def test_opcheck(entry, device_name):
    if device_name not in entry.devices:
        pytest.skip(f"{entry.qualified} has no {device_name} kernel (devices: {entry.devices})")
    op = getattr(getattr(torch.ops, entry.namespace), entry.name).default
    args = entry.make_args(torch.device(device_name))
    torch.library.opcheck(op, args)

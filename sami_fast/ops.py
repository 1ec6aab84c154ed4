"""Support for the public functions' ``torch.library`` custom ops (their form under torch.compile).

Under ``torch.compile`` each public op is one custom op, opaque to the compiler, whose
backward (``register_autograd``) is a second custom op that recomputes the forward with
autograd and differentiates it. A custom op's implementation runs with the Autograd
dispatch keys excluded, so that recomputation re-enables them (``autograd_inside_op``).
"""

import contextlib

import torch


@contextlib.contextmanager
def autograd_inside_op():
    """Autograd records again inside a custom op's implementation (and grad mode is on)."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in dir(torch._C.DispatchKey):
        if name.startswith("Autograd") or name == "ADInplaceOrView":
            exclude = exclude.remove(getattr(torch._C.DispatchKey, name))
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield

"""The cloud-VM agent: runs guests (L2) inside a cloud VM (L1) on regions L0 attached.

The agent listens only on a virtio-serial port whose other end is a unix socket on L0, so no
network peer (and no other cloud VM) can reach it. :mod:`.protocol` is the wire format and the
L0-side client; :mod:`.server` is what runs inside the cloud VM.
"""

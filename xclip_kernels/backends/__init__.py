"""The backends: one module (a package for triton) per backend, named as the backend.

``reference``, ``sdpa``, ``xformers``, ``triton``, ``cpp``, ``cuda``. Each holds its
implementation of the ops and one ``BACKEND`` declaration of what it supports
(:mod:`.base`); :mod:`xclip_kernels.registry` collects the declarations and chooses.
``_extension`` loads the compiled extension that ``cpp`` and ``cuda`` share. Nothing here is
imported by ``import xclip_kernels``.
"""

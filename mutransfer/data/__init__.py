"""Token data: prepare text into shards (``prepare``), read them back with a deterministic sampler
(``dataset``), the built-in corpus (``builtin``), and the ``data`` sub-commands (``cli``).

Nothing is imported here, so ``mutransfer``'s command line can register ``data`` without torch."""

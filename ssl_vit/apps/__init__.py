"""The top floor: applications built on the library. Nothing outside ``apps/`` imports them.

* ``demo``: `ssl-vit demo`, the end-to-end example on scikit-learn's digits;
* ``runs``: building blocks of end-to-end runs (in-process and child `ssl-vit` commands, k-NN of a
  feature function over image folders);
* ``quality``: the CIFAR-10 representation-quality benchmark;
* ``benchmark``: the training-throughput benchmark;
* ``commands``: the `ssl-vit` entry point.
"""

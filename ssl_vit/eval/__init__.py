"""Evaluation maths on frozen features, without Lightning: the features a probe or k-NN reads off a
ViT (``features``), the weighted k-NN vote (``knn``), and splitting / gathering across ranks
(``distributed``). The Lightning stages (``ssl_vit.methods.knn``, ``probe``) and the k-NN monitor
callback (``ssl_vit.training.knn_monitor``) use them."""

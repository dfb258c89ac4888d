"""Checkpoints: the ssl_vit format (``format``), safe reading (``io``), loading a backbone from every
known format (``load``) and what architecture a file holds (``arch``), the reference formats
(``mae``, ``dino``) and the export in timm's own format (``timm_export``)."""

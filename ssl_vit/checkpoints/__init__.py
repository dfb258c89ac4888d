"""Checkpoints: the ssl_vit format (``format``), safe reading (``io``), loading a backbone from every
known format (``load``), the reference formats (``mae``, ``dino``) and the export to timm
(``timm_export``)."""

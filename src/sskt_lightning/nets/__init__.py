"""Networks. Importing this package registers the CIFAR-style nets with timm (``cifar_*``)."""
from sskt_lightning.nets import cifar_resnet, cifar_vgg, cifar_wrn  # noqa: F401

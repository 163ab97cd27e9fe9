"""Networks: the class-conditional generator and the channel-reduced feature-map discriminator."""

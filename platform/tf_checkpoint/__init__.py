"""Reading deeplab2's TensorFlow checkpoints without TensorFlow, and mapping them onto our model."""

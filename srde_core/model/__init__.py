"""The SRDE layer (router + expert bank + frozen base MLP) and its attachment to HF models."""

"""Settings, models, keys, topology, broker and partner clients shared by the ingress and workers."""

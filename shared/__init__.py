"""Settings, models, keys, topology, broker and partner clients of the ingress and workers."""

"""epp: the endpoint picker over Envoy's external processing API (`inferplane epp`) and the
Envoy bootstrap for it (`inferplane envoy-config`)."""

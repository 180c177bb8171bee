"""Cluster mode (docs/scale.md): the balancers' shared session table and label blocks in etcd.
Imported only when the configuration has `cluster:`; one balancer never loads etcd's client."""

"""cumulo.cluster"""

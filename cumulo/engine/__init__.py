"""cumulo.engine"""

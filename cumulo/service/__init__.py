"""cumulo.service"""

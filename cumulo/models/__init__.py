"""cumulo.models"""

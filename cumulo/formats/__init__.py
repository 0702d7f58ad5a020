"""cumulo.formats"""

"""cumulo.chips"""

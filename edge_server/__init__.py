"""edge_server"""

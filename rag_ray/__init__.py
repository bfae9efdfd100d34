"""rag_ray"""

"""tvm_lite.rpc"""

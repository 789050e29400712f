import time, torch

def spaced_ms(fn, n=10, reps=9):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        for _ in range(n):
            fn()
    gr.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        time.sleep(0.03)
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); gr.replay(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b) / n)
    return sorted(ts)[reps // 2]

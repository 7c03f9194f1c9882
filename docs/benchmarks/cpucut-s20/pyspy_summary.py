import sys, collections, re
tot=0; incl=collections.Counter(); selfc=collections.Counter(); ipself=collections.Counter()
for line in open(sys.argv[1]):
    stack, n = line.rstrip().rsplit(' ',1); n=int(n); tot+=n
    frames = stack.split(';')
    seen=set()
    for f in frames:
        key=re.sub(r':\d+\)', ')', f)
        if key not in seen: incl[key]+=n; seen.add(key)
    selfc[re.sub(r':\d+\)', ')', frames[-1])]+=n
    # deepest inferplane frame
    ip=[f for f in frames if 'inferplane/' in f]
    if ip: ipself[re.sub(r':\d+\)', ')', ip[-1])]+=n
    else: ipself['<no inferplane frame>']+=n
print('total', tot)
print('--- inclusive')
for k,v in incl.most_common(70): print(f'{v:5d} {100*v/tot:5.1f}% {k}')
print('--- self')
for k,v in selfc.most_common(40): print(f'{v:5d} {100*v/tot:5.1f}% {k}')
print('--- deepest inferplane frame')
for k,v in ipself.most_common(50): print(f'{v:5d} {100*v/tot:5.1f}% {k}')
